"""One study cell: exactly `train/multi_turn.py`'s command line (``cli_main``), run by the
study runner as ``python -m alp_agents.study.cell --config BASE... key=value...``."""

import sys

from alp_agents.trainer import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(None, None, description=__doc__))
