# Intent Bus: everything runs with the standard library of Python 3.9+.
PYTHON ?= python3

.PHONY: serve test stress stress-batch help

help:
	@echo "make serve   run the server on 127.0.0.1:8080 (database ./intentbus.db)"
	@echo "make test    run the test suite"
	@echo "make stress  run the heavy stress preset (40 workers, 2000 jobs)"
	@echo "make stress-batch  the batch run of the README's Performance section"

serve:
	$(PYTHON) intentbus.py serve

test:
	$(PYTHON) test_intentbus.py

stress:
	$(PYTHON) stress.py --preset heavy

stress-batch:
	$(PYTHON) stress.py --workers 40 --jobs 20000 --batch 50 --submit-batch 50
