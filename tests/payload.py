"""The pickle payload of the security tests: unpickling it runs Python code (exec) that creates
a marker file. test_cli_errors.py proves once that it does; every loader test then shows the
loader refused it, the marker's absence proving that nothing ran."""


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))
