"""Leaf utilities: output folders and checkpoint checks (`outputs`), the offline teacher checkpoint (`teachers`),
a CSV logging callback (`callbacks`) and plots (`plots`)."""
