from components.cli import run_alone
from components.select_subset.cli import subset

run_alone(subset, "python -m components.select_subset")
