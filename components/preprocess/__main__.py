from components.preprocess.cli import preprocess_cmd

preprocess_cmd(prog_name="python -m components.preprocess")
