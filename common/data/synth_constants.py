"""Statistics of the real RSNA data that the synthetic generator reproduces.

Source: the RSNA Pneumonia Detection Challenge (2018) stage 2 training set, 26,684
images: ``stage_2_train_labels.csv`` (30,227 rows, 9,555 boxes, 6,012 positive patients),
``stage_2_detailed_class_info.csv`` and the DICOM header table of all 26,684 images.
Derived on 2026-12-04 with ``benchmarks/derive_rsna_statistics.py``; the generator never
reads the source files.

Conventions: coordinates are pixels of the 1024 x 1024 RSNA image, origin top-left.
"Left" and "right" are the image's halves (x below or above 512); the image's left half
shows the patient's right lung. Probabilities are rounded to five decimals, so a table may
sum to 1 +- 1e-4; the generator normalises each table before drawing from it.
"""

from __future__ import annotations

REFERENCE_SIZE = 1024
"""Side of the RSNA images in pixels; box statistics are in these pixels."""

REAL_IMAGES = 26_684
REAL_POSITIVE_IMAGES = 6_012
REAL_BOXES = 9_555
REAL_POSITIVE_RATE = REAL_POSITIVE_IMAGES / REAL_IMAGES  # 0.2253

VIEW_POSITION_PROBS = {"AP": 0.45619, "PA": 0.54381}

SEX_PROBS_BY_VIEW = {
    "AP": {"F": 0.42118, "M": 0.57882},
    "PA": {"F": 0.44042, "M": 0.55958},
}

POSITIVE_RATE_BY_VIEW_SEX = {
    ("AP", "F"): 0.38073,
    ("AP", "M"): 0.38490,
    ("PA", "F"): 0.08606,
    ("PA", "M"): 0.09828,
}
"""Share of images with at least one box, per ViewPosition and PatientSex."""

NORMAL_SHARE_OF_NEGATIVES_BY_VIEW = {"AP": 0.21801, "PA": 0.54805}
"""Share of negative images with class "Normal"; the rest are
"No Lung Opacity / Not Normal"."""

AGE_BIN_WIDTH = 5
AGE_BIN_STARTS = tuple(range(0, 105, AGE_BIN_WIDTH))
"""Age bins [start, start + 5) years. Five headers with ages 148-155 (recording errors)
were left out."""

AGE_BIN_PROBS_BY_VIEW = {
    "AP": (0.00304, 0.0138, 0.02226, 0.03458, 0.06194, 0.06457, 0.08092, 0.0612, 0.08445,
           0.10055, 0.10474, 0.13579, 0.08593, 0.07623, 0.03836, 0.02004, 0.00756, 0.00296,
           0.00107, 0.0, 0.0),
    "PA": (0.00193, 0.00717, 0.01468, 0.02875, 0.04798, 0.05749, 0.06797, 0.07438, 0.08741,
           0.10451, 0.12298, 0.1285, 0.10499, 0.07659, 0.04446, 0.01978, 0.00793, 0.00214,
           0.00034, 0.0, 0.0),
}

PIXEL_SPACING_PROBS_BY_VIEW = {
    "AP": {0.115: 0.00041, 0.139: 0.3631, 0.143: 0.00008, 0.168: 0.54687, 0.171: 0.08897,
           0.1943: 0.00033, 0.1988: 0.00025},
    "PA": {0.115: 0.00021, 0.139: 0.07518, 0.143: 0.61967, 0.168: 0.14871, 0.171: 0.06292,
           0.1938: 0.00014, 0.1943: 0.09317},
}
"""PixelSpacing in millimetres (rounded to 0.1 um), per ViewPosition."""

BOXES_PER_POSITIVE_PROBS_BY_VIEW = {
    "AP": {1: 0.35678, 2: 0.61921, 3: 0.02144, 4: 0.00257},
    "PA": {1: 0.70475, 2: 0.28042, 3: 0.01409, 4: 0.00074},
}

LEFT_BOX_COUNT_PROBS = {
    1: {0: 0.38103, 1: 0.61897},
    2: {0: 0.00888, 1: 0.97857, 2: 0.01255},
    3: {1: 0.37815, 2: 0.61345, 3: 0.0084},
    4: {1: 0.15385, 2: 0.84615},
}
"""For an image with n boxes: probabilities of how many box centres lie in the left half."""

QUANTILE_LEVELS = (0.0, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                   0.975, 0.99, 1.0)
"""Cumulative probabilities at which the quantile tables below are given; the generator
interpolates linearly between them (a piecewise-linear inverse CDF)."""

BOX_WIDTH_QUANTILES_BY_VIEW = {
    "AP": (56.0, 98.0, 113.0, 126.0, 145.0, 170.0, 189.0, 205.0, 219.0, 234.0, 251.0, 271.0,
           296.0, 319.0, 339.3, 365.1, 528.0),
    "PA": (40.0, 80.0, 96.0, 113.0, 130.0, 155.0, 172.0, 188.0, 204.0, 222.0, 240.0, 261.0,
           289.0, 309.7, 328.0, 358.0, 422.0),
}

BOX_HEIGHT_QUANTILES_BY_VIEW = {
    "AP": (45.0, 91.0, 113.0, 131.0, 159.0, 203.0, 242.0, 281.0, 327.0, 377.0, 433.0, 499.0,
           576.0, 637.0, 680.0, 727.1, 942.0),
    "PA": (46.0, 68.0, 78.6, 94.0, 116.0, 142.0, 164.0, 187.0, 212.0, 240.0, 274.0, 319.0,
           398.0, 468.7, 538.8, 624.0, 851.0),
}

BOX_CENTER_Y_QUANTILES = (130.0, 254.3, 300.0, 342.4, 385.5, 436.0, 472.0, 502.0, 531.0,
                          560.5, 592.0, 628.5, 678.0, 720.0, 753.0, 791.7, 945.0)

BOX_CENTER_X_QUANTILES_BY_SIDE = {
    "left": (87.5, 176.0, 200.9, 220.0, 244.0, 272.0, 290.5, 305.0, 319.0, 335.0, 351.5,
             370.5, 398.0, 424.7, 444.0, 467.0, 506.0),
    "right": (513.0, 567.4, 592.0, 614.5, 635.5, 664.5, 684.0, 699.5, 714.0, 728.0, 743.5,
              764.0, 789.5, 811.5, 832.0, 853.4, 899.5),
}

BOX_COPULA_CORRELATION_BY_VIEW = {
    "AP": ((1.0, 0.6311, -0.015), (0.6311, 1.0, -0.2206), (-0.015, -0.2206, 1.0)),
    "PA": ((1.0, 0.5775, 0.0858), (0.5775, 1.0, -0.1017), (0.0858, -0.1017, 1.0)),
}
"""Gaussian-copula correlation of (width, height, centre y) per view: the Pearson
correlation 2 sin(pi rho_s / 6) matching each Spearman rank correlation rho_s. Taller
boxes sit higher (their centre y is smaller) in AP images."""
