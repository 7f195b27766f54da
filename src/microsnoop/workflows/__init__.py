"""Commands that chain the layers below: a whole plate run (fields -> profiles -> metrics -> report)."""
