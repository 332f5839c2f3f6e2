"""A checker worker: ``python -m rewards.math.worker`` reads one JSON request per line on stdin
and writes one JSON verdict per line on a private copy of stdout.

It is a plain subprocess, not a ``multiprocessing`` child, so it does not depend on the start
method vLLM sets (spawn re-imports the trainer's ``__main__``, and torch with it), and it
imports only sympy, latex2sympy2_extended and math_verify.
"""

from __future__ import annotations

import json
import os
import sys
import warnings


def main() -> None:
    # Keep the protocol on its own descriptor: anything a library prints goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.CRITICAL)  # math_verify warns once per process about timeouts
    from rewards.math.calculate import calculate
    from rewards.math.equivalence import equivalent

    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if "calculate" in request:  # the calculator tool (rollouts/agent/builtin_tools.py)
            try:
                reply = {"result": calculate(request["calculate"])}
            except Exception as error:  # the tool's result says why; the worker lives on
                reply = {"error": str(error) or type(error).__name__}
            protocol.write(json.dumps(reply) + "\n")
            continue
        try:
            equal, why = equivalent(request["gold"], request["pred"], **request.get("options", {}))
        except Exception as error:  # a bad item scores 0; the worker lives on
            equal, why = False, f"error:{type(error).__name__}"
        protocol.write(json.dumps({"equal": bool(equal), "why": why}) + "\n")


if __name__ == "__main__":
    main()
