"""Pure model logic (online learners, label ledger, change detection): comes with the online-models issue."""
