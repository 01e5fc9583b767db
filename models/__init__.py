"""Pure model logic (online learners, label ledger, change detection): arrives with the online-models issue."""
