"""`python -m ddpm ARGS` runs the `ddpm` command (cli.main), as the console script does: for an environment whose
scripts folder is not on PATH. Messages name the command as it was run ("see python3 -m ddpm gen --help")."""

from .cli import main, module_prog

if __name__ == "__main__":
    main(prog_name=module_prog("ddpm"))
