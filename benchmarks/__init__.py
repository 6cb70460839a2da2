"""asv benchmark suites of numbattn (see docs/asv.md).

``bench_*.py`` are asv suites; ``common.py`` holds their shared helpers.
Only asv suites live here (asv's discovery imports every module of this
package); the standalone benchmark scripts are in ``scripts/``.
"""
