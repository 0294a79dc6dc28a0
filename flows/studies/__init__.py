"""Studies: named sets of arms (objective × distribution × layers × batch size × mode × overrides × seed)
run as Prefect flow runs and reported with bootstrap intervals (``seqedit study``)."""
