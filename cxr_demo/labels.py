"""Label sets of the tasks the zoo knows, in the order the cards and heads use."""

NIH14_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)

# The official box list spells one finding differently from the label table.
NIH_BOX_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}


def display_name(label: str) -> str:
    """A label as people read it: ``Pleural_Thickening`` -> ``Pleural thickening``, ``COVID-19`` unchanged."""
    words = label.replace("_", " ").split(" ")
    return " ".join([words[0]] + [w if w.isupper() else w.lower() for w in words[1:]])
