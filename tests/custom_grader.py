"""A user grader for the tests: right when the answer, read as a number, is within 0.5 of the reference."""


def close_enough(answer, reference, row):
    try:
        return abs(float(answer) - float(reference)) <= 0.5
    except ValueError:
        return False
