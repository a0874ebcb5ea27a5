"""The paper's numbers: the column order of its tables and AKI-4B's row of Table 2."""

COLUMNS = ("MME-P", "MME-C", "MMB", "SEED-I", "LLaVA-W", "MMMU", "MathV", "POPE", "MM-Vet", "RWQA", "CVB-2D", "CVB-3D")

AKI_4B_TABLE_2 = {
    "MME-P": 1491.9, "MME-C": 362.9, "MMB": 73.1, "SEED-I": 69.4, "LLaVA-W": 74.6, "MMMU": 38.7,
    "MathV": 32.1, "POPE": 86.9, "MM-Vet": 40.8, "RWQA": 58.9, "CVB-2D": 62.1, "CVB-3D": 71.8,
}  # fmt: skip

# Table 1 (Phi-3.5-mini, the controlled setting): the causal baseline and MMA rows.
TABLE_1 = {
    "causal": dict(
        zip(COLUMNS, (1226.3, 258.2, 64.9, 64.1, 47.0, 31.1, 24.2, 79.8, 24.3, 50.6, 45.2, 54.3), strict=True)
    ),
    "mma": dict(zip(COLUMNS, (1363.7, 315.4, 71.8, 67.1, 59.6, 37.3, 26.4, 82.7, 30.2, 52.3, 57.8, 64.1), strict=True)),
}
