"""Shell completion for `edgeship-device`: a bash script written from its argparse parser.

argparse has no completion of its own, and a device should not need another package for it, so the script
is generated from the parser itself (commands and each command's options) and cannot drift from it.
zsh runs it through `bashcompinit`. Paths and values fall back to the shell's file completion.

    source <(edgeship-device --show-completion)
"""

from __future__ import annotations

import argparse

PROGRAM = "edgeship-device"


def bash_script(parser: argparse.ArgumentParser) -> str:
    """A bash completion function for `parser`: command names first, then the chosen command's options."""
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = sorted(subparsers.choices)
    global_words = _options(parser)
    takes_value = [o for a in parser._actions if a.option_strings and a.nargs != 0 for o in a.option_strings]
    cases = "\n".join(f"        {name}) words=\"{' '.join(_options(sub))}\" ;;"
                      for name, sub in sorted(subparsers.choices.items()))
    skip = "|".join(takes_value) or "--"
    return f"""# bash completion for {PROGRAM} (generated from its parser: {PROGRAM} --show-completion)
_edgeship_device() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} command="" skip="" word words i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word=${{COMP_WORDS[i]}}
        if [[ -n $skip ]]; then skip=""; continue; fi
        case $word in
            {skip}) skip=1 ;;
            -*) ;;
            *) command=$word; break ;;
        esac
    done
    case $command in
        "") words="{' '.join(commands + global_words)}" ;;
{cases}
        *) words="" ;;
    esac
    COMPREPLY=( $(compgen -W "$words" -- "$cur") )
}}
if [[ -n ${{ZSH_VERSION:-}} ]]; then autoload -U +X bashcompinit && bashcompinit; fi
complete -o default -F _edgeship_device {PROGRAM}
"""


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings]


class ShowCompletion(argparse.Action):
    """`--show-completion`: print the script and exit (`wire` first adds the commands wired on demand)."""

    def __init__(self, option_strings, dest, wire=None, help=None):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)
        self.wire = wire

    def __call__(self, parser, namespace, values, option_string=None):
        if self.wire is not None:
            self.wire()
        print(bash_script(parser), end="")
        parser.exit()
