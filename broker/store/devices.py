"""Devices: inventory, connection details, containment state."""

from __future__ import annotations

from typing import Any

from broker.store.base import StoreBase


class DeviceQueries(StoreBase):
    """Devices: part of :class:`broker.store.Store`."""

    def insert_device(self, row: dict[str, Any]) -> None:
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        self.execute(f"INSERT INTO devices ({cols}) VALUES ({marks})", tuple(row.values()))

    def get_device(self, name: str) -> dict[str, Any] | None:
        return self.one("SELECT * FROM devices WHERE name = ?", (name,))

    def list_devices(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM devices ORDER BY name")

    def delete_device(self, name: str) -> int:
        return self.execute_ending("DELETE FROM devices WHERE name = ?", (name,)).rowcount

    def set_device_containment(self, name: str, state: str, checked_at: str, details: str) -> None:
        """Store the result of a containment check (shared by every broker process: the session-start cache)."""
        self.execute("UPDATE devices SET containment = ?, containment_checked_at = ?, containment_details = ? "
                     "WHERE name = ?", (state, checked_at, details, name))

    def update_device(self, name: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE devices SET {sets} WHERE name = ?", (*values.values(), name))
