"""Target device profiles (`profiles`) and the fit / speed / energy estimates (`fit`)."""
