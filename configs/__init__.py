"""Shipped configs (YAML only): `sasi train --config imagenet100/byol` finds them by name."""
