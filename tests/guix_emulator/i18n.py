"""Guix's messages in the user's language: `G_` and `N_` as guix/ui.scm and guix/status.scm use
them (gettext), for the messages this emulator prints, in German and French.

The translations are Guix's own, from its catalogues po/guix/de.po and po/guix/fr.po
(wahjava/guix 3652bbe6), with Guile's "~a" written "{}".  Which language gettext picks is
glibc's rule (intl/dcigettext.c guess_category_value): the LC_MESSAGES locale is LC_ALL, else
LC_MESSAGES, else LANG; a locale of "C" or "POSIX" means no translation, whatever LANGUAGE
says; otherwise LANGUAGE, a colon-separated list, comes first when it is not empty, and then
the locale's own language.  "C.UTF-8" is not "C" to that rule, but there is no "C" catalogue:
with LANGUAGE empty, it means English too.  Daemon errors are never translated ("FIXME:
Server-provided error messages aren't i18n'd", ui.scm).

Emulator detail: the locale is taken as installed (real Guix warns "failed to install locale"
and stays in English when GUIX_LOCPATH lacks it).
"""

from __future__ import annotations

import os

# msgid -> {language: msgstr}; a plural entry's msgid is "singular|plural" and its msgstr
# "singular|plural" too (de and fr have two forms: n == 1, and the rest).
CATALOGUE: dict[str, dict[str, str]] = {
    # guix/diagnostics.scm print-diagnostic-prefix
    "error: ": {"de": "Fehler: ", "fr": "erreur : "},
    "warning: ": {"de": "Warnung: ", "fr": "avertissement : "},
    # guix/ui.scm call-with-error-handling
    "failed to connect to `{}': {}": {
        "de": "Verbindung zu „{}“ fehlgeschlagen: {}",
        "fr": "impossible de se connecter à « {} » : {}"},
    # guix/ui.scm show-what-to-build
    "The following derivation would be built:|The following derivations would be built:": {
        "de": "Folgende Ableitung würde erstellt:|Folgende Ableitungen würden erstellt:",
        "fr": "La dérivation suivante serait compilée :|Les dérivations suivantes seraient "
              "compilées :"},
    "The following derivation will be built:|The following derivations will be built:": {
        "de": "Folgende Ableitung wird erstellt:|Folgende Ableitungen werden erstellt:",
        "fr": "La dérivation suivante sera compilée :|Les dérivations suivantes seront "
              "compilées :"},
    "{} MB would be downloaded:": {"de": "{} MB würden heruntergeladen:",
                                   "fr": "{} Mo seraient téléchargés :"},
    "{} MB will be downloaded:": {"de": "{} MB werden heruntergeladen:",
                                  "fr": "{} Mo seront téléchargés :"},
    "The following file would be downloaded:|The following files would be downloaded:": {
        "de": "Folgende Datei würde heruntergeladen:|Folgende Dateien würden heruntergeladen:",
        "fr": "Le fichier suivant serait téléchargé :|Les fichiers suivants seraient "
              "téléchargés :"},
    "The following file will be downloaded:|The following files will be downloaded:": {
        "de": "Die folgende Datei wird heruntergeladen:|Die folgenden Dateien werden "
              "heruntergeladen:",
        "fr": "Le fichier suivant sera téléchargé :|Les fichiers suivants seront "
              "téléchargés :"},
    # guix/status.scm print-build-event
    "building {}...": {"de": "{} wird erstellt …", "fr": "construction de {}..."},
    "successfully built {}": {"de": "{} wurde erfolgreich erstellt",
                              "fr": "construction de {} réussie"},
    "build of {} failed": {"de": "Erstellung von {} fehlgeschlagen",
                           "fr": "la compilation de {} a échoué"},
    "Could not find build log for '{}'.": {
        "de": "Kein Erstellungsprotokoll für „{}“ gefunden.",
        "fr": "Aucun journal de compilation pour « {} »."},
    "View build log at '{}'.": {
        "de": "Das Erstellungsprotokoll kann unter „{}“ eingesehen werden.",
        "fr": "Vous trouverez le journal de compilation dans « {} »."},
    "substituting {}...": {"de": "Substituiere {} …", "fr": "substitution de {}..."},
    "downloading from {} ...": {"de": "Lade von {} herunter …",
                                "fr": "téléchargement depuis {}..."},
    "substitution of {} failed": {"de": "Substitution von {} fehlgeschlagen",
                                  "fr": "la substitution de {} a échoué"},
    "{} hash mismatch for {}:": {"de": "„{}“-Prüfsummenfehler für {}:",
                                 "fr": "l'empreinte {} ne correspond pas pour {} :"},
    "offloading build of {} to '{}'": {
        "de": "Auslagern der Erstellung von {} an „{}“",
        "fr": "déchargement de la construction de {} sur « {} »"},
}


def language() -> str | None:
    """The language gettext translates into, or None for Guix's own English."""
    locale = (os.environ.get("LC_ALL") or os.environ.get("LC_MESSAGES")
              or os.environ.get("LANG") or "C")
    if locale in ("C", "POSIX"):
        return None
    wanted = [w for w in os.environ.get("LANGUAGE", "").split(":") if w]
    wanted.append(locale)
    for entry in wanted:
        code = entry.split(".")[0].split("@")[0]
        for candidate in (code, code.split("_")[0]):
            if candidate in ("de", "fr"):
                return candidate
    return None


def G_(msgid: str) -> str:
    """The translation of `msgid`, or `msgid` itself."""
    lang = language()
    return CATALOGUE.get(msgid, {}).get(lang, msgid) if lang else msgid


def N_(singular: str, plural: str, count: int) -> str:
    """ngettext: the singular or plural form for `count`, translated."""
    entry = CATALOGUE.get(f"{singular}|{plural}", {})
    lang = language()
    forms = entry[lang].split("|") if lang and lang in entry else [singular, plural]
    return forms[0] if count == 1 else forms[1]
