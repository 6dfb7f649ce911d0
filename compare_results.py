"""Collect every WORK_DIR/results/*_results.json into results/summary.csv, print them side by side and draw
DSC, bAHD, FID and SSIM against epsilon (results/summary_vs_epsilon.png), as in the paper's figures. Per noise
multiplier: the mean (SD) over seeds and the best run by val DSC, with its epsilon alone and the epsilon of the
pick, every run of that noise composed (results/summary_by_noise.csv).

Example: python compare_results.py
"""

import argparse

from utils.common import print_setup, script_main
from utils.compare import compare, results_dir


@script_main
def main(argv=None):
    print_setup("compare_results.py")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None, help="results folder (default WORK_DIR/results)")
    args = parser.parse_args(argv)
    folder = args.results or results_dir()
    rows, table = compare(folder)
    print(table)
    print(f"\n{len(rows)} training inputs -> {folder}/summary.csv, {folder}/summary_vs_epsilon.png")
    return rows


if __name__ == "__main__":
    main()
