"""An example tool module: one plain tool and one long-running tool, in one file.

Run the bot with it (and the demo) loaded::

    TOOL_MODULES=jobs.activate_line,examples.weather make run

then, in the Playground, say ``weather in Paris`` (answered in the turn) or ``weather report for
Oslo`` (a background job: a card shows its progress and the bot posts the report when it is done).
The weather is made up from the city's name, so the example needs no network or API key.
"""

from __future__ import annotations

import re
import zlib
from typing import Annotated, Any

from pydantic import Field

from jobs.context import JobContext
from jobs.registry import PermanentJobError, RetryPolicy, tool, tool_setting

SKIES = ("sunny", "partly cloudy", "cloudy", "rainy", "windy", "snowy")
City = Annotated[str, Field(min_length=1, max_length=80, description="A city name, e.g. Paris")]


def report_seconds() -> float:
    """WEATHER_REPORT_SECONDS (default 6): how long a report takes to prepare."""
    return tool_setting("WEATHER_REPORT_SECONDS", 6.0)


def _forecast(city: str, day: int) -> str:
    seed = zlib.crc32(f"{city.strip().lower()}:{day}".encode())  # the same city gives the same weather
    return f"{SKIES[seed % len(SKIES)]}, {seed % 30 - 5} °C"


# A plain tool: runs in the turn; the model gets the returned text at once.
@tool(example="weather in Paris", timeout=10,
      offline_phrase=re.compile(r"^(?:what(?:'s| is) the )?weather in (?P<city>[^?!.]+)[?!.]*$", re.I))
async def get_weather(city: City) -> str:
    """Today's weather in a city."""
    return f"The weather in {city.strip()} today: {_forecast(city, 0)}."


# A long-running tool: a call records a durable job; the bot announces the result when it finishes.
@tool(long_running=True, timeout=max(60.0, report_seconds() * 3), retry=RetryPolicy(max_attempts=2),
      example="weather report for Oslo",
      offline_phrase=re.compile(r"\bweather report for (?P<city>[^?!.]*?)(?: for (?P<days>\d+) days?)?[?!.]*$",
                                re.I))
async def weather_report(ctx: JobContext, city: City,
                         days: Annotated[int, Field(ge=1, le=7, description="How many days")] = 3) -> dict[str, Any]:
    """A detailed weather report for a city over the next days. Takes a while to prepare."""
    if city.strip().lower() == "atlantis":
        raise PermanentJobError("there is no weather station in Atlantis")  # retrying cannot help
    lines = []
    for day in range(days):
        await ctx.report_progress(day / days, f"Day {day + 1} of {days}")
        await ctx.sleep(report_seconds() / days)  # stops at once if the job is cancelled
        lines.append(f"day {day + 1}: {_forecast(city, day)}")
    return {"city": city, "days": days,  # ``message`` is what the bot tells the user
            "message": f"🌦️ Weather report for {city.strip()}: " + "; ".join(lines) + "."}
