"""A base for the project's named choices (sharding types, storage
locations): enums whose values are the strings configs and plans spell,
parsed with an error that lists the valid ones."""

from __future__ import annotations

import enum
from typing import List, Optional


class StrChoice(str, enum.Enum):
    """A choice spelled as a string; compares equal to its value."""

    @classmethod
    def setting_name(cls) -> str:
        """What the error calls the value (e.g. "sharding_type")."""
        return cls.__name__

    @classmethod
    def str_values(cls) -> List[str]:
        return [member.value for member in cls]

    @classmethod
    def from_str(cls, value, where: Optional[str] = None):
        """The member named by ``value`` (a member, or its string, any case);
        ``where`` (e.g. "for table 't0'") goes into the error."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            place = f" {where}" if where else ""
            raise ValueError(
                f"Invalid {cls.setting_name()}={value!r}{place}. Must be one of {', '.join(cls.str_values())}."
            ) from None

    def __str__(self) -> str:
        return self.value
