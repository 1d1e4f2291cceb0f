"""``python -m nexuscore.schemas``: regenerate the committed ``.avsc`` files from the events."""

from nexuscore.schemas._avro import write_all

for path in write_all():
    print(path)
