"""The paper's numbers: the column order of its tables and AKI-4B's row of Table 2."""

COLUMNS = ("MME-P", "MME-C", "MMB", "SEED-I", "LLaVA-W", "MMMU", "MathV", "POPE", "MM-Vet", "RWQA", "CVB-2D", "CVB-3D")

AKI_4B_TABLE_2 = {
    "MME-P": 1491.9, "MME-C": 362.9, "MMB": 73.1, "SEED-I": 69.4, "LLaVA-W": 74.6, "MMMU": 38.7,
    "MathV": 32.1, "POPE": 86.9, "MM-Vet": 40.8, "RWQA": 58.9, "CVB-2D": 62.1, "CVB-3D": 71.8,
}  # fmt: skip
