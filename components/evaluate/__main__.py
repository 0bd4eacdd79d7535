from components.evaluate.cli import evaluate_cmd

evaluate_cmd(prog_name="python -m components.evaluate")
