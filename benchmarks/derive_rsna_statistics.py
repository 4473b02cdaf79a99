"""Derive the synthetic generator's constants from the RSNA stage 2 training metadata.

Reads the labels CSV, the class CSV and the DICOM header table of the RSNA Pneumonia
Detection Challenge (26,684 images) and prints the body of
``common/data/synth_constants.py``. It is run by hand when the constants are refreshed;
the product never reads the metadata at run time.

    python benchmarks/derive_rsna_statistics.py /path/to/rsna-metadata > constants.txt
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

QUANTILE_LEVELS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                   0.975, 0.99, 1.0)
AGE_BIN_WIDTH = 5
AGE_LIMIT = 100  # ages above this are recording errors (148-155 in 5 headers)
IMAGE_SIDE = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metadata", type=Path, help="folder with the RSNA labels, classes, headers")
    folder = parser.parse_args().metadata
    labels = pd.read_csv(folder / "stage_2_train_labels.csv")
    classes = pd.read_csv(folder / "stage_2_detailed_class_info.csv").drop_duplicates("patientId")
    headers = pd.read_csv(folder / "stage_2_train_dicom_headers.csv.gz")
    headers = headers.rename(columns={"PatientID": "patientId"})
    target = labels.groupby("patientId")["Target"].max().rename("target")
    patients = headers.merge(target, left_on="patientId", right_index=True)
    patients = patients.merge(classes, on="patientId", how="left")

    out = []
    out.append(_probabilities("VIEW_POSITION_PROBS", patients["ViewPosition"]))
    out.append(_by_view("SEX_PROBS_BY_VIEW", patients, "PatientSex"))
    out.append(_positive_rates(patients))
    negatives = patients[patients["target"] == 0]
    normal = negatives.groupby("ViewPosition")["class"].apply(lambda s: (s == "Normal").mean())
    out.append(f"NORMAL_SHARE_OF_NEGATIVES_BY_VIEW = {_round_dict(normal.to_dict())}")
    out.append(_ages(patients))
    spacing = patients.assign(PixelSpacing=patients["PixelSpacing"].round(4))
    out.append(_by_view("PIXEL_SPACING_PROBS_BY_VIEW", spacing, "PixelSpacing"))
    out.extend(_boxes(labels, patients))
    print("\n\n".join(out))


def _probabilities(name: str, values: pd.Series) -> str:
    shares = values.value_counts(normalize=True).sort_index()
    return f"{name} = {_round_dict(shares.to_dict())}"


def _by_view(name: str, frame: pd.DataFrame, column: str) -> str:
    result = {}
    for view, group in frame.groupby("ViewPosition"):
        result[view] = _round_dict(group[column].value_counts(normalize=True).sort_index().to_dict())
    return f"{name} = {result}"


def _positive_rates(patients: pd.DataFrame) -> str:
    rates = patients.groupby(["ViewPosition", "PatientSex"])["target"].mean()
    return f"POSITIVE_RATE_BY_VIEW_SEX = {_round_dict(rates.to_dict())}"


def _ages(patients: pd.DataFrame) -> str:
    edges = list(range(0, AGE_LIMIT + AGE_BIN_WIDTH, AGE_BIN_WIDTH))
    result = {}
    for view, group in patients.groupby("ViewPosition"):
        ages = group["PatientAge"][group["PatientAge"] <= AGE_LIMIT]
        counts, _ = np.histogram(ages, bins=edges + [edges[-1] + AGE_BIN_WIDTH])
        result[view] = tuple(round(float(c / counts.sum()), 5) for c in counts)
    return f"AGE_BIN_EDGES = {tuple(edges)}\n\nAGE_BIN_PROBS_BY_VIEW = {result}"


def _boxes(labels: pd.DataFrame, patients: pd.DataFrame) -> list[str]:
    boxes = labels[labels["Target"] == 1].merge(patients[["patientId", "ViewPosition"]], on="patientId")
    boxes = boxes.assign(
        cx=boxes["x"] + boxes["width"] / 2, cy=boxes["y"] + boxes["height"] / 2
    )
    boxes["side"] = np.where(boxes["cx"] < IMAGE_SIDE / 2, "left", "right")
    out = [f"QUANTILE_LEVELS = {QUANTILE_LEVELS}"]
    per_image = boxes.groupby("patientId").agg(
        view=("ViewPosition", "first"), n=("side", "size"), left=("side", lambda s: (s == "left").sum())
    )
    counts = {}
    for view, group in per_image.groupby("view"):
        counts[view] = _round_dict(group["n"].value_counts(normalize=True).sort_index().to_dict())
    out.append(f"BOXES_PER_POSITIVE_PROBS_BY_VIEW = {counts}")
    split = {}
    for n, group in per_image.groupby("n"):
        split[int(n)] = _round_dict(group["left"].value_counts(normalize=True).sort_index().to_dict())
    out.append(f"LEFT_BOX_COUNT_PROBS = {split}")
    for column, name in (("width", "BOX_WIDTH"), ("height", "BOX_HEIGHT")):
        table = {v: _quantiles(g[column]) for v, g in boxes.groupby("ViewPosition")}
        out.append(f"{name}_QUANTILES_BY_VIEW = {table}")
    out.append(f"BOX_CENTER_Y_QUANTILES = {_quantiles(boxes['cy'])}")
    sides = {side: _quantiles(g["cx"]) for side, g in boxes.groupby("side")}
    out.append(f"BOX_CENTER_X_QUANTILES_BY_SIDE = {sides}")
    copula = {}
    for view, group in boxes.groupby("ViewPosition"):
        spearman = group[["width", "height", "cy"]].corr(method="spearman").to_numpy()
        # Pearson correlation of the Gaussian copula with this Spearman rho: 2 sin(pi rho / 6).
        pearson = 2 * np.sin(math.pi * spearman / 6)
        copula[view] = tuple(tuple(round(float(v), 4) for v in row) for row in pearson)
    out.append(f"BOX_COPULA_CORRELATION_BY_VIEW = {copula}")
    return out


def _quantiles(values: pd.Series) -> tuple[float, ...]:
    return tuple(round(float(q), 1) for q in np.quantile(values, QUANTILE_LEVELS))


def _round_dict(mapping: dict) -> dict:
    return {_plain(k): round(float(v), 5) for k, v in mapping.items()}


def _plain(key):
    if isinstance(key, tuple):
        return tuple(_plain(k) for k in key)
    if isinstance(key, (np.integer,)):
        return int(key)
    if isinstance(key, (np.floating,)):
        return float(key)
    return key


if __name__ == "__main__":
    main()
