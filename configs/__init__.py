"""Named experiment configs (installed as `jaxft_configs`): `jaxft train NAME[:ARG]`.

Each module defines `get_config(arg=None)`; its docstring holds the command, the
hardware and the expected result. `common.py` holds the fields every config has.
"""
