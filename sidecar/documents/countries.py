"""Countries (ISO 3166-1 alpha-2, the officially assigned codes) and a loose tax id check: an EU VAT number
must carry its country's prefix (EL for Greece); elsewhere only its shape is checked."""

from __future__ import annotations

import re

_ASSIGNED = """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV
    BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES
    ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE
    IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU
    NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM
    SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE
    VG VI VN VU WF WS YE YT ZA ZM ZW
"""
CODES = frozenset(_ASSIGNED.split())
# The EU member states and their VAT number prefixes (ISO codes but Greece's).
_EU = "AT BE BG CY CZ DE DK EE ES FI FR HR HU IE IT LT LU LV MT NL PL PT RO SE SI SK"
EU_VAT_PREFIX = {c: c for c in _EU.split()}
EU_VAT_PREFIX["GR"] = "EL"
_EU_VAT_BODY = re.compile(r"[0-9A-Z+*]{2,13}\Z")
_OTHER_TAX_ID = re.compile(r"[0-9A-Za-z][0-9A-Za-z .\-/]{1,38}[0-9A-Za-z]\Z")


def country_of(value: str) -> str:
    """The ISO 3166-1 alpha-2 code (upper-cased), or ValueError."""
    code = value.strip().upper()
    if code not in CODES:
        raise ValueError(f"{value!r} is not an ISO 3166-1 alpha-2 country code")
    return code


def tax_id_of(value: str, country: str) -> str:
    """The tax id as stored (an EU VAT number compacted: no spaces, dots or dashes, upper-cased), or
    ValueError saying what is wrong with it."""
    prefix = EU_VAT_PREFIX.get(country)
    if prefix is None:
        trimmed = value.strip()
        if not _OTHER_TAX_ID.match(trimmed):
            raise ValueError("a tax id is 3 to 40 letters, digits, spaces, dots, dashes or slashes")
        return trimmed
    compact = re.sub(r"[\s.\-]", "", value).upper()
    if not compact.startswith(prefix):
        raise ValueError(f"an EU VAT number of {country} starts with {prefix}")
    if not _EU_VAT_BODY.match(compact[len(prefix) :]):
        raise ValueError(f"an EU VAT number is {prefix} and 2 to 13 letters or digits")
    return compact
