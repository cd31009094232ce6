from nanochat_core.bench import main
from nanochat_core.common import run_main

run_main(main)
