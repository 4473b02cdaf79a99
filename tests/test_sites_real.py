"""Site partitions of the real RSNA headers (26,684 patients)."""

import pandas as pd
import pytest

from common.sites import partition, rsna_metadata_frame
from common.sites.frames import RSNA_HEADERS_FILE


@pytest.fixture(scope="module")
def real_records(rsna_metadata):
    return rsna_metadata_frame(rsna_metadata)


@pytest.fixture(scope="module")
def real_headers(rsna_metadata):
    # Read independently of the code under test.
    return pd.read_csv(rsna_metadata / RSNA_HEADERS_FILE, usecols=["PatientID", "ViewPosition"])


def test_view_position_split_reproduces_real_proportions(real_records, real_headers):
    purity = 0.8
    result = partition(real_records, setup="attribute", attribute="ViewPosition", num_sites=4, purity=purity, seed=0)
    manifest = result.manifest
    # The union of the sites keeps every real film once: the real AP/PA counts exactly.
    assert len(manifest) == len(real_headers) == 26684
    assert manifest["ViewPosition"].value_counts().to_dict() == real_headers["ViewPosition"].value_counts().to_dict()
    assert result.dominant == ("AP", "PA", "AP", "PA")
    # Positive rates of AP and PA films in the real data; each site mixes them by purity.
    rate = real_records.groupby("ViewPosition")["target"].mean()
    for site, dominant in enumerate(result.dominant):
        other = "PA" if dominant == "AP" else "AP"
        rows = manifest[manifest["site"] == site]
        # Rounding by columns moves a site by at most 2 films (2 values).
        assert abs((rows["ViewPosition"] == dominant).mean() - purity) <= 2 / len(rows)
        expected_rate = purity * rate[dominant] + (1 - purity) * rate[other]
        # Stratified dealing keeps each value's positives proportional within one film.
        assert abs(rows["target"].mean() - expected_rate) <= 3 / len(rows), site


def test_view_position_sites_are_larger_for_pa(real_records, real_headers):
    result = partition(real_records, setup="attribute", attribute="ViewPosition", num_sites=2, purity=0.9, seed=1)
    sizes = result.summary.set_index("site")["images"]
    ap, pa = (real_headers["ViewPosition"] == "AP").sum(), (real_headers["ViewPosition"] == "PA").sum()
    # Two values: S_AP = (0.9 n_AP - 0.1 n_PA) / 0.8, exact up to rounding by 2 films.
    assert abs(sizes[0] - (0.9 * ap - 0.1 * pa) / 0.8) <= 2
    assert sizes.sum() == ap + pa
