from components.cli import run_alone
from components.register.cli import register_cmd

run_alone(register_cmd, "python -m components.register")
