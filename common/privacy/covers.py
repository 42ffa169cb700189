"""What each printed epsilon covers, worded once.

The server's books (worst client: the summary and ``dpfpl report``) and a node's export manifest (one node's
records) print the same four mechanisms; both word them from ``MECHANISMS``, so a change of what an epsilon
means is made here and read the same everywhere.
"""

from __future__ import annotations

MECHANISMS = {
    "local": "the LDP mechanism alone (p_L's noisy updates)",
    "gdp-mechanism": "the server's GDP releases alone; NOT a bound on p_G when replies read local state (every "
    "method with a local prompt)",
    "global": "p_G (anything the server publishes): the composed LDP+GDP epsilon where replies read local state, "
    "the GDP epsilon only for methods without a local prompt",
    "published": "the published personalized prompt p_G + p_L (LDP and GDP composed)",
}

WORST_CLIENT = "worst client"
THIS_NODE = "the exporting node's records"

# the server's books: each epsilon is the maximum over the booked clients
SERVER_COVERS = {
    "epsilon-local-max": f"{MECHANISMS['local']}, {WORST_CLIENT}",
    "epsilon-gdp-mechanism-max": f"{MECHANISMS['gdp-mechanism']}; {WORST_CLIENT}",
    "epsilon-global-max": f"{MECHANISMS['global']}; {WORST_CLIENT}",
    "epsilon-published-max": f"{MECHANISMS['published']}, {WORST_CLIENT}",
}

# a node's export manifest: its own records, plus the server's worst other client for p_G
MANIFEST_COVERS = {
    "epsilon": f"{MECHANISMS['published']}, {THIS_NODE}",
    "epsilon_local": MECHANISMS["local"],
    "epsilon_global": f"{MECHANISMS['global']}; {THIS_NODE}",
    "epsilon_gdp_mechanism": MECHANISMS["gdp-mechanism"],
    "epsilon_other_clients": f"{MECHANISMS['global']}; worst other client's records, from the server's books",
}
