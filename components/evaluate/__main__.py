from components.cli import run_alone
from components.evaluate.cli import evaluate_cmd

run_alone(evaluate_cmd, "python -m components.evaluate")
