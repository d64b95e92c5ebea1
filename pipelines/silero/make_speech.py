"""Make speech.npz: synthetic, labelled 16 kHz speech clips for the Silero VAD ONNX model.

int8flow needs a labelled evaluation set and a calibration set for silero-vad that work offline, in
CI, with no dataset download. This script synthesises sentences with espeak-ng in several voices,
speeds and pitches, puts the utterances between stretches of digital silence and low-level noise,
and labels every 32 ms model frame (512 samples) as speech (1) or non-speech (0). The labels come
from the synthesis alone, never from a model: a sample is speech if it lies inside a placed
utterance *and* that utterance's own clean energy envelope is active there, with gaps shorter than
MAX_BRIDGED_PAUSE_S bridged. So word-internal stops and short comma pauses count as speech, while
longer pauses inside an utterance (sentence breaks, SSML <break>s) do not. A frame is speech if at
least half of its samples are.

Run it once by hand and commit the output; CI and pipelines/silero_data.py only read the .npz:

    apt-get install -y espeak-ng
    .venv/bin/python pipelines/silero/make_speech.py   # writes pipelines/silero/speech.npz

The committed speech.npz was made with espeak-ng 1.51 (Debian package 1.51+dfsg-10+deb12u2) and
scipy 1.17.1. Everything is seeded, and espeak-ng gives the same waveform for the same input, so a
re-run with that version reproduces the file; another version may move samples and labels a little.
The file records the espeak-ng version it was made with (key `espeak_version`).
"""

from __future__ import annotations

import itertools
import random
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
FRAME_SAMPLES = 512  # what the 16 kHz model consumes per step, besides 64 samples of context
CLIP_FRAMES = 100  # 3.2 s: long enough for 1-3 utterances, short enough to keep the file small
EVALUATION_CLIPS, CALIBRATION_CLIPS = 30, 12
EVALUATION_SEED, CALIBRATION_SEED = 4001, 4002
OUTPUT = Path(__file__).with_name("speech.npz")

ENVELOPE_WINDOW = 160  # 10 ms
# Relative to the utterance's loudest 10 ms. Weak fricatives sit around -30 dB; espeak-ng's own
# silences are exact zeros, so the threshold only decides where word edges fall.
ACTIVE_BELOW_PEAK_DB = 40.0
MAX_BRIDGED_PAUSE_S = 0.3

WORDS = {
    "en": """time people year way day man thing woman life child world school state family
        student group country problem hand part place case week company system program question
        work government number night point home water room mother area money story fact month lot
        right study book eye job word business issue side kind head house service friend father
        power hour game line end member law car city community name president team minute idea
        kid body information back parent face others level office door health person art war
        history party result change morning reason research girl guy moment air teacher force
        education foot boy age policy music market sense nation plan college interest death
        experience effect class control care field development role effort rate heart drug show
        leader light voice wife police mind price report decision son view relationship town road
        arm difference value building action model season society tax director position player
        record paper space ground form event official matter center couple site project activity
        star table need court oil situation cost industry figure street image phone data picture
        practice piece land product doctor wall patient worker news test movie north love support
        technology step baby computer type attention film tree source organization hair window
        evidence population site training will go see know get make think take come want look use
        find give tell ask seem feel try leave call keep let begin help talk turn start show hear
        play run move like live believe hold bring happen write provide sit stand lose pay meet
        include continue set learn change lead understand watch follow stop create speak read
        allow add spend grow open walk win offer remember consider appear buy wait serve die send
        expect build stay fall cut reach kill remain suggest raise pass sell require decide
        good new first last long great little own other old right big high different small large
        next early young important few public bad same able late hard major better economic strong
        possible whole free military true federal political real best sure clear recent certain
        personal open red difficult available likely short single medical current wrong private
        past foreign fine common poor natural significant similar hot dead central happy serious
        ready simple left physical general environmental financial blue democratic dark various
        entire close legal religious cold final main green nice huge popular traditional cultural
        the a of and to in for on with at by from up about into over after quickly really always
        never often today tomorrow yesterday again together almost maybe perhaps already still""",
    "de": """Haus Zeit Jahr Mensch Tag Kind Frau Mann Stadt Land Welt Leben Hand Arbeit Wasser Schule
        Auto Buch Freund Woche Morgen Abend Musik Geld Weg Frage Antwort Familie Garten Zug heute
        gestern morgen immer nie schnell langsam gut schlecht neu alt gross klein schön kalt warm
        gehen kommen sehen machen sagen geben finden denken wissen spielen lesen schreiben und
        der die das ein eine mit auf in zu von nach wir sie er ich sehr noch schon wieder""",
    "es": """casa tiempo año persona día niño mujer hombre ciudad país mundo vida mano trabajo agua
        escuela coche libro amigo semana mañana tarde música dinero camino pregunta familia jardín
        tren hoy ayer siempre nunca rápido despacio bueno malo nuevo viejo grande pequeño bonito
        frío caliente ir venir ver hacer decir dar encontrar pensar saber jugar leer escribir y
        el la los un una con en de para por nosotros ella él yo muy todavía ya otra vez""",
}
# Language -> espeak-ng voices that read it; mostly English, with two other languages for prosody.
VOICES = {
    "en": ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc"),
    "de": ("de",),
    "es": ("es",),
}
LANGUAGE_WEIGHTS = {"en": 6, "de": 1, "es": 1}
# Built-in espeak-ng voice variants; whisper and the like are left out because they are unvoiced,
# and a VAD is not expected to call whispering speech.
VARIANTS = (
    "m1",
    "m2",
    "m3",
    "m4",
    "m5",
    "m6",
    "m7",
    "f1",
    "f2",
    "f3",
    "f4",
    "f5",
    "klatt",
    "klatt2",
    "klatt3",
    "klatt4",
    "croak",
    "Annie",
    "michel",
    "Alex",
)


@dataclass(frozen=True)
class Speaker:
    language: str
    voice: str
    speed: int  # words per minute
    pitch: int  # 0-99
    word_gap: int  # extra pause between words, in 10 ms units

    def describe(self) -> str:
        return f"{self.voice} s{self.speed} p{self.pitch} g{self.word_gap}"


@dataclass(frozen=True)
class Utterance:
    text: str
    audio: np.ndarray  # float64 at SAMPLE_RATE, peak 1, trimmed to its first and last active sample
    active: np.ndarray  # bool per sample: the speech part of `audio`


def espeak_version() -> str:
    return subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout.strip()


def random_speaker(rng: random.Random) -> Speaker:
    language = rng.choices(list(LANGUAGE_WEIGHTS), weights=list(LANGUAGE_WEIGHTS.values()))[0]
    voice = f"{rng.choice(VOICES[language])}+{rng.choice(VARIANTS)}"
    return Speaker(
        language, voice, speed=rng.randint(120, 210), pitch=rng.randint(20, 80), word_gap=rng.choice((0, 0, 0, 1, 2, 4))
    )


def random_text(rng: random.Random, language: str, max_words: int) -> str:
    """A seeded word salad with punctuation and, sometimes, an explicit SSML pause.

    Nonsense is fine for a VAD; the commas, full stops and breaks give utterances inner pauses
    of different lengths, some above and some below MAX_BRIDGED_PAUSE_S.
    """
    words = WORDS[language].split()
    count = rng.randint(max(1, max_words // 3), max_words)
    pieces = [rng.choice(words) for _ in range(count)]
    for position in sorted(rng.sample(range(1, count), k=min(count - 1, rng.randint(0, 2))), reverse=True):
        marks = (",", ".", f' <break time="{rng.randrange(150, 800, 50)}ms"/>')
        pieces[position - 1] += rng.choices(marks, weights=(3, 2, 2))[0]
    return " ".join(pieces).capitalize() + rng.choice((".", "?", "!"))


def synthesise(text: str, speaker: Speaker) -> np.ndarray:
    """espeak-ng's 22.05 kHz output resampled to SAMPLE_RATE, as float64 in int16 units."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "utterance.wav"
        # -m reads the SSML <break>s; --stdout would write a WAV header without sizes, so use a file.
        subprocess.run(
            [
                "espeak-ng",
                "-m",
                "-v",
                speaker.voice,
                "-s",
                str(speaker.speed),
                "-p",
                str(speaker.pitch),
                "-g",
                str(speaker.word_gap),
                "-w",
                str(path),
                text,
            ],
            check=True,
            capture_output=True,
        )
        with wave.open(str(path)) as reader:
            assert reader.getsampwidth() == 2 and reader.getnchannels() == 1
            rate = reader.getframerate()
            samples = np.frombuffer(reader.readframes(reader.getnframes()), np.int16)
    assert rate == 22_050, rate  # the 320/441 ratio below assumes it
    return resample_poly(samples.astype(np.float64), 320, 441)


def active_samples(audio: np.ndarray) -> np.ndarray:
    """Per-sample speech mask from the clean utterance's 10 ms energy envelope, pauses shorter
    than MAX_BRIDGED_PAUSE_S bridged."""
    windows = len(audio) // ENVELOPE_WINDOW
    energy = np.sqrt(np.mean(audio[: windows * ENVELOPE_WINDOW].reshape(windows, -1) ** 2, axis=1))
    active = energy > energy.max() * 10 ** (-ACTIVE_BELOW_PEAK_DB / 20)
    on = np.flatnonzero(active)
    longest_bridge = int(MAX_BRIDGED_PAUSE_S * SAMPLE_RATE / ENVELOPE_WINDOW)
    for start, end in itertools.pairwise(on):
        if 1 < end - start <= longest_bridge:
            active[start:end] = True
    mask = np.zeros(len(audio), bool)
    mask[: windows * ENVELOPE_WINDOW] = np.repeat(active, ENVELOPE_WINDOW)
    return mask


def make_utterance(rng: random.Random, speaker: Speaker, max_words: int) -> Utterance:
    text = random_text(rng, speaker.language, max_words)
    audio = synthesise(text, speaker)
    active = active_samples(audio)
    on = np.flatnonzero(active)
    # espeak-ng pads its output with silence; trimming it lets the layout place real speech.
    first, last = on[0], on[-1] + 1
    audio = audio[first:last]
    return Utterance(text, audio / np.abs(audio).max(), active[first:last])


def coloured_noise(np_rng: np.random.Generator, length: int, rms: float) -> np.ndarray:
    """White, pink or brown noise with the given RMS (in int16 units)."""
    exponent = np_rng.choice((0.0, 1.0, 2.0))  # power falls as 1/f**exponent
    spectrum = np.fft.rfft(np_rng.standard_normal(length))
    frequencies = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
    spectrum[1:] /= (frequencies[1:] / frequencies[1]) ** (exponent / 2)
    spectrum[0] = 0
    noise = np.fft.irfft(spectrum, length)
    return noise * rms / np.sqrt(np.mean(noise**2))


def faded(stretch: np.ndarray, fade: int = 320) -> np.ndarray:
    """20 ms raised-cosine fades, so noise stretches do not start with a click."""
    fade = min(fade, len(stretch) // 2)
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
    stretch = stretch.copy()
    stretch[:fade] *= ramp
    stretch[len(stretch) - fade :] *= ramp[::-1]
    return stretch


def dbfs(np_rng: np.random.Generator, low: float, high: float) -> float:
    return 32768 * 10 ** (np_rng.uniform(low, high) / 20)


def make_clip(rng: random.Random, np_rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, str]:
    """One clip: (int16 audio, uint8 frame labels, description of what was placed where)."""
    length = CLIP_FRAMES * FRAME_SAMPLES
    speaker = random_speaker(rng)
    speech = np.zeros(length)
    is_speech = np.zeros(length, bool)
    notes = [speaker.describe()]
    position = int(rng.uniform(0.1, 0.9) * SAMPLE_RATE)
    gaps = [(0, position)]
    for attempt in range(12):
        # Long texts rarely fit in what is left of the clip; ask for fewer words each time.
        utterance = make_utterance(rng, speaker, max_words=max(2, 10 - attempt))
        if position + len(utterance.audio) > length - int(0.1 * SAMPLE_RATE):
            continue
        end = position + len(utterance.audio)
        speech[position:end] = utterance.audio * dbfs(np_rng, -14, -1)
        is_speech[position:end] = utterance.active
        notes.append(f"{position / SAMPLE_RATE:.2f}s: {utterance.text}")
        position = end + int(rng.uniform(0.35, 1.2) * SAMPLE_RATE)
        gaps.append((end, min(position, length)))
        if position >= length - int(0.5 * SAMPLE_RATE):
            break
    assert len(notes) > 1, "no utterance fitted in the clip"
    gaps[-1] = (gaps[-1][0], length)  # the tail after the last utterance is a gap too
    audio = speech + background(np_rng, length) + noise_stretches(rng, np_rng, gaps, length)
    labels = is_speech.reshape(CLIP_FRAMES, FRAME_SAMPLES).mean(axis=1) >= 0.5
    return np.clip(np.rint(audio), -32768, 32767).astype(np.int16), labels.astype(np.uint8), " | ".join(notes)


def background(np_rng: np.random.Generator, length: int) -> np.ndarray:
    """A noise floor under the whole clip, or digital silence for a third of the clips."""
    if np_rng.random() < 1 / 3:
        return np.zeros(length)
    return coloured_noise(np_rng, length, dbfs(np_rng, -75, -55))


def noise_stretches(
    rng: random.Random, np_rng: np.random.Generator, gaps: list[tuple[int, int]], length: int
) -> np.ndarray:
    """Louder (but still low-level) noise inside some gaps: non-speech sound the VAD must reject."""
    noise = np.zeros(length)
    for start, end in gaps:
        if end - start < int(0.2 * SAMPLE_RATE) or rng.random() < 0.5:
            continue
        stretch = rng.randint(int(0.15 * SAMPLE_RATE), end - start)
        offset = start + rng.randint(0, end - start - stretch)
        noise[offset : offset + stretch] = faded(coloured_noise(np_rng, stretch, dbfs(np_rng, -55, -38)))
    return noise


def make_split(count: int, seed: int) -> dict[str, np.ndarray]:
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    audio, labels, notes = zip(*(make_clip(rng, np_rng) for _ in range(count)), strict=True)
    return {"audio": np.stack(audio), "labels": np.stack(labels), "notes": np.array(notes)}


def main() -> None:
    arrays: dict[str, np.ndarray] = {}
    for split, count, seed in (
        ("evaluation", EVALUATION_CLIPS, EVALUATION_SEED),
        ("calibration", CALIBRATION_CLIPS, CALIBRATION_SEED),
    ):
        for key, value in make_split(count, seed).items():
            arrays[f"{split}_{key}"] = value
        print(f"{split}: {count} clips, speech in {arrays[f'{split}_labels'].mean():.0%} of frames")
    np.savez_compressed(OUTPUT, **arrays, sample_rate=np.int64(SAMPLE_RATE), espeak_version=np.array(espeak_version()))
    print(f"wrote {OUTPUT} ({OUTPUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
