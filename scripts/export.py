"""``python scripts/export.py`` = ``stmt-export`` (:func:`stmt_monai.cli.export`), as the bundle READMEs write it."""

from stmt_monai.cli import export_main

if __name__ == "__main__":
    export_main()
