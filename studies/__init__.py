"""Studies and demos built on klal: scripts, not library (klal never imports them).

* :mod:`studies.demo`: the quickstart demo (``python -m studies.demo``).
* :mod:`studies.reproduce`: the small-scale Base vs NTP vs NTP + KLAL study (``python -m studies.reproduce``).
"""
