"""Privacy auditing in one run: an empirical epsilon lower bound beside the accountant's upper bound
(``dpfpl audit``; docs/audit.md)."""
