"""A corpus of personal data for the guard tests: values that validate and values that do not
(a wrong check digit, an impossible date), in English and Chinese text."""

from __future__ import annotations

import random

from appliance.guards.pii import luhn_ok

_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def cn_id(rng: random.Random, valid: bool = True) -> str:
    region = rng.choice(["110105", "310101", "440305", "510104", "330106"])
    body = f"{region}{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body += f"{rng.randint(0, 999):03d}"
    check = "10X98765432"[sum(int(c) * w for c, w in zip(body, _CN_WEIGHTS, strict=True)) % 11]
    if not valid:
        check = rng.choice([c for c in "0123456789X" if c != check])
    return body + check


def card(rng: random.Random, valid: bool = True, spaced: bool = False) -> str:
    digits = "4" + "".join(str(rng.randint(0, 9)) for _ in range(14))
    last = next(str(d) for d in range(10) if luhn_ok(digits + str(d)))
    if not valid:
        last = str((int(last) + rng.randint(1, 9)) % 10)
    full = digits + last
    return " ".join(full[i : i + 4] for i in range(0, 16, 4)) if spaced else full


def iban(rng: random.Random, valid: bool = True) -> str:
    bban = "".join(str(rng.randint(0, 9)) for _ in range(18))  # DE: 8-digit bank, 10 account
    numeric = int(bban + "131400")  # D=13 E=14, check digits 00
    check = 98 - numeric % 97
    if not valid:
        check = check + 1 if check < 98 else check - 1
    raw = f"DE{check:02d}{bban}"
    return " ".join(raw[i : i + 4] for i in range(0, len(raw), 4))


def cn_mobile(rng: random.Random, style: int = 0) -> str:
    n = f"1{rng.choice('3456789')}{rng.randint(0, 999999999):09d}"
    return [n, f"+86 {n[:3]} {n[3:7]} {n[7:]}", f"+86{n}", f"{n[:3]}-{n[3:7]}-{n[7:]}"][style % 4]


VALID_FIXED = [
    "bob.smith@example.com",
    "wang.li@company.cn",
    "+1 415 555 2671",
    "(202) 555-0147",
    "+44 20 7946 0958",
    "192.168.1.10",
    "10.0.0.254",
    "2001:db8::8a2e:370:7334",
    "fe80::1ff:fe23:4567:890a",
    "00:1A:2B:3C:4D:5E",
    "a4-5e-60-e2-1f-08",
    "sk-proj-abcdefghijklmnopqrstuvwxyz012345",
    "AKIAIOSFODNN7EXAMPLE",
    "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "GB82 WEST 1234 5698 7654 32",
    "3782 822463 10005",
]
#: Look like identifiers but do not validate: never masked.
INVALID_FIXED = [
    "12345678901",
    "1380013800",
    "999.1.1.1",
    "4111 1111 1111 1112",
    "GB82 WEST 1234 5698 7654 33",
    "110105194902301234",
    "00:1A:2B:3C:4D",
    "sk-short",
    "20240101",
    "2024-01-01",
    "12:30:45",
    "std::vector",
    "v1.2.3",
    "AKIA1234",
]

FILLER_EN = "the line stopped at station four and the operator wrote a note for the next shift"
FILLER_ZH = "生产线在第四工位停止运行操作员为下一班留下了记录请尽快联系维修人员处理"


def valid_values(rng: random.Random) -> list[str]:
    return [
        cn_id(rng),
        cn_id(rng),
        card(rng),
        card(rng, spaced=True),
        iban(rng),
        *(cn_mobile(rng, i) for i in range(4)),
        *VALID_FIXED,
    ]


def invalid_values(rng: random.Random) -> list[str]:
    return [cn_id(rng, False), card(rng, False), iban(rng, False), *INVALID_FIXED]


def document(rng: random.Random, values: list[str]) -> str:
    """Values embedded in English or Chinese filler, each set apart as text would set it."""
    words = FILLER_EN.split()
    parts = []
    for v in values:
        if rng.random() < 0.5:
            parts.append(
                " ".join(rng.sample(words, rng.randint(1, 5)))
                + " "
                + v
                + rng.choice([" ", ". ", ", "])
            )
        else:
            i = rng.randint(0, len(FILLER_ZH) - 6)
            parts.append(
                FILLER_ZH[i : i + rng.randint(1, 6)]
                + rng.choice(["：", "是", " "])
                + v
                + rng.choice(["，", "。", " "])
            )
    return "".join(parts)
