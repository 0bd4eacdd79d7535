from components.predict.cli import predict_cmd

predict_cmd(prog_name="python -m components.predict")
