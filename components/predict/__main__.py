from components.cli import run_alone
from components.predict.cli import predict_cmd

run_alone(predict_cmd, "python -m components.predict")
