"""Recipe files: one YAML file per paper configuration, found on disk (not a hand-kept list).

``mtssm recipe list`` shows them; ``mtssm recipe run NAME`` runs one. A recipe may sit in a
sub-folder; its name is the file's stem, which must be unique.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["RECIPE_DIR", "find_recipe", "list_recipes", "recipe_files"]

#: The folder holding the packaged recipe files.
RECIPE_DIR = Path(__file__).resolve().parent


def recipe_files(root: str | Path = RECIPE_DIR) -> list[Path]:
    """Every ``*.yaml`` file under ``root``, recursively, sorted by path."""
    return sorted(p for p in Path(root).rglob("*.yaml") if p.is_file())


def list_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> file path for every packaged recipe."""
    found: dict[str, Path] = {}
    for path in recipe_files():
        if path.stem in found:
            raise ValueError(f"two recipe files are named {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def find_recipe(name: str | Path) -> Path:
    """The file of recipe ``name``, or ``name`` itself when it is the path of a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    recipes = list_recipes()
    if str(name) not in recipes:
        raise ValueError(f"unknown recipe {str(name)!r}; valid recipes: {', '.join(recipes)}")
    return recipes[str(name)]
