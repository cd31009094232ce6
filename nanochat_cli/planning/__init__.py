"""Money and offers, in plain Python (no sky, no torch).

    offers.py    what a GPU request means, interconnect labels, which offers a launch may fail over to
    planner.py   dollars -> depth, tokens, hours, cost, deadlines
    cost.py      the live cost meter: spent, projected, ETA, the 80% warning
"""
