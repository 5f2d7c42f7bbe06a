"""The built-in `builtin/shapes` model: procedural scenes, their training recipe and a judge."""
