"""PipeDream's driver: start every rank of a job from one YAML file and log it (pipedap/pipeline/driver.py).

    python driver.py --config_file driver_configs/resnet50_single_machine.yml
"""

import sys

from pipedap.pipeline.driver import main

if __name__ == "__main__":
    sys.exit(main())
