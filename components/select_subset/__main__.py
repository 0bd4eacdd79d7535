from components.select_subset.cli import subset

subset(prog_name="python -m components.select_subset")
