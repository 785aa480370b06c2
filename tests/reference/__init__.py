"""Independent reference implementations the tests compare firmware against."""
