from components.register.cli import register_cmd

register_cmd(prog_name="python -m components.register")
