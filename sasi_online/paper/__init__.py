"""The paper's tables: runs per table cell (`tables`), run scripts (`script`) and the
collected results beside the paper's numbers (`collect`, `numbers.yaml`)."""
