//! A task whose answers a program can check: multi-step arithmetic word
//! problems generated from a seed, and a checker that scores every
//! sentence of an answer on the five aspects (0-4) without any judge.
//!
//! Per segment: *correctness* 4, or 0 when a calculation it states
//! (`a op b = c`, "which makes 42") is wrong or it gives a wrong final
//! answer; *helpfulness* 4 when it reaches a value of the solution not
//! reached before, 2 when it only talks, 0 when it is wrong; *completeness*
//! the share of the solution's steps reached so far (0-4), 4 once the
//! right final answer is given; *clarity* 4, 1 for a segment that repeats an
//! earlier one, 2 for a rambling one; *safety* 4.

use dpo2d_data::{segment, Response, Scores, Segment};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Add,
    Sub,
    Mul,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Sub => "subtract",
            Op::Mul => "multiply",
        }
    }

    fn apply(self, a: i64, b: i64) -> i64 {
        match self {
            Op::Add => a + b,
            Op::Sub => a - b,
            Op::Mul => a * b,
        }
    }
}

/// One problem: its text, the values of its solution in order, the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub id: String,
    pub question: String,
    /// `(a, op, b, result)` of each step of the solution.
    pub steps: Vec<(i64, Op, i64, i64)>,
    pub answer: i64,
}

impl Problem {
    /// The question as the policy is asked it (in evaluation and when
    /// sampling training answers alike): the story, and how to answer.
    /// A one-step problem asks for its one calculation (asked to go step by
    /// step, a small model invents further steps); the others for every step.
    pub fn prompt(&self) -> String {
        let how = if self.steps.len() == 1 { "Write the calculation" } else { "Work it out step by step" };
        format!("{}\n{how}, then give the final answer as: The answer is N.", self.question)
    }
}

/// Which side of the train / held-out split; a problem's side is fixed by
/// its text, so the two sets never share a problem, whatever the seeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    HeldOut,
}

fn split_of(question: &str) -> Split {
    let h = Sha256::digest(question.as_bytes());
    if h[0] % 5 == 0 {
        Split::HeldOut
    } else {
        Split::Train
    }
}

/// How large a problem's numbers are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Numbers {
    /// Every number up to 10, factors up to 3.
    Tiny,
    /// The first number up to 20, factors up to 5.
    Small,
    /// The first number up to 60, factors up to 9 (dpo2d's first problems).
    Larger,
}

/// How hard the problems are: the number of steps and how large the numbers.
/// `arithmetic` alone means level 5 (the two-step problems dpo2d has always
/// generated, unchanged); `arithmetic-L` names another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Level {
    /// 1-3 calculations from the story's numbers to the answer.
    pub steps: usize,
    pub numbers: Numbers,
}

impl Level {
    /// Levels 1-6, easiest first.
    pub const ALL: [Level; 6] = [
        Level { steps: 1, numbers: Numbers::Tiny },
        Level { steps: 1, numbers: Numbers::Small },
        Level { steps: 1, numbers: Numbers::Larger },
        Level { steps: 2, numbers: Numbers::Small },
        Level { steps: 2, numbers: Numbers::Larger },
        Level { steps: 3, numbers: Numbers::Larger },
    ];
    /// What `arithmetic` without a level means.
    pub const DEFAULT: Level = Level::ALL[4];

    /// 1-based, as on the command line.
    pub fn number(self) -> usize {
        Level::ALL.iter().position(|l| *l == self).map_or(0, |i| i + 1)
    }

    /// `arithmetic` or `arithmetic-L`.
    pub fn name(self) -> String {
        if self == Level::DEFAULT {
            "arithmetic".into()
        } else {
            format!("arithmetic-{}", self.number())
        }
    }

    /// Reads `arithmetic` / `arithmetic-L`; `None` for any other word.
    pub fn parse(s: &str) -> Option<Result<Level, String>> {
        let rest = s.strip_prefix("arithmetic")?;
        if rest.is_empty() {
            return Some(Ok(Level::DEFAULT));
        }
        let n = rest.strip_prefix('-')?;
        Some(match n.parse::<usize>() {
            Ok(n) if (1..=Level::ALL.len()).contains(&n) => Ok(Level::ALL[n - 1]),
            _ => Err(format!("{s}: the arithmetic levels are 1-{} (arithmetic-1 .. arithmetic-{})", Level::ALL.len(), Level::ALL.len())),
        })
    }

    /// `level 2: 1 step, small numbers`.
    pub fn describe(self) -> String {
        format!(
            "level {}: {} step{}, {} numbers",
            self.number(),
            self.steps,
            if self.steps == 1 { "" } else { "s" },
            match self.numbers {
                Numbers::Tiny => "tiny",
                Numbers::Small => "small",
                Numbers::Larger => "larger",
            }
        )
    }

    fn templates(self) -> &'static [(&'static str, &'static [Op])] {
        match self.steps {
            1 => ONE_STEP,
            2 => TWO_STEPS,
            _ => THREE_STEPS,
        }
    }

    /// The story's first number.
    fn first(self, op: Op, rng: &mut StdRng) -> i64 {
        match (op, self.numbers) {
            (Op::Mul, Numbers::Tiny) => rng.gen_range(2..=5),
            (Op::Mul, Numbers::Small) => rng.gen_range(2..=6),
            (Op::Mul, Numbers::Larger) => rng.gen_range(2..=12),
            (_, Numbers::Tiny) => rng.gen_range(2..=10),
            (_, Numbers::Small) => rng.gen_range(2..=20),
            (_, Numbers::Larger) => rng.gen_range(10..=60),
        }
    }

    /// The number a step applies to the running `value`.
    fn operand(self, op: Op, value: i64, rng: &mut StdRng) -> i64 {
        match (op, self.numbers) {
            (Op::Mul, Numbers::Tiny) => rng.gen_range(2..=3),
            (Op::Mul, Numbers::Small) => rng.gen_range(2..=5),
            (Op::Mul, Numbers::Larger) => rng.gen_range(2..=9),
            (Op::Sub, Numbers::Tiny) => rng.gen_range(1..=value.clamp(2, 10)),
            (Op::Sub, Numbers::Small) => rng.gen_range(1..=value.clamp(2, 10)),
            (Op::Sub, Numbers::Larger) => rng.gen_range(1..=value.clamp(2, 30)),
            (Op::Add, Numbers::Tiny) => rng.gen_range(1..=10),
            (Op::Add, Numbers::Small) => rng.gen_range(1..=10),
            (Op::Add, Numbers::Larger) => rng.gen_range(2..=40),
        }
    }
}

/// Templates: a story with `{n}` slots for the numbers, the operations
/// applied left to right, and the unit of the answer.
const ONE_STEP: &[(&str, &[Op])] = &[
    ("{name} has {0} apples and buys {1} more. How many apples does {name} have now?", &[Op::Add]),
    ("A shop sells pencils in boxes of {0}. {name} buys {1} boxes. How many pencils does {name} have?", &[Op::Mul]),
    ("{name} reads {0} pages a day for {1} days. How many pages did {name} read?", &[Op::Mul]),
    ("A bus has {0} passengers. At the first stop {1} get off. How many passengers are on the bus?", &[Op::Sub]),
    ("{name} saves {0} dollars and spends {1} dollars on a gift. How many dollars are left?", &[Op::Sub]),
    ("A farm has {0} hens and buys {1} more. How many hens does the farm have?", &[Op::Add]),
    ("{name} has {0} marbles and wins {1} more. How many marbles does {name} have?", &[Op::Add]),
    ("There are {0} rows of {1} chairs in a hall. How many chairs are there?", &[Op::Mul]),
];
const TWO_STEPS: &[(&str, &[Op])] = &[
    ("{name} has {0} apples. {pron} buys {1} more, then gives {2} to a friend. How many apples does {name} have now?", &[Op::Add, Op::Sub]),
    (
        "A shop sells pencils in boxes of {0}. {name} buys {1} boxes and then {2} loose pencils. How many pencils does {name} have?",
        &[Op::Mul, Op::Add],
    ),
    (
        "{name} reads {0} pages a day for {1} days, and then {2} pages more on the last evening. How many pages did {name} read?",
        &[Op::Mul, Op::Add],
    ),
    (
        "A bus starts with {0} passengers. At the first stop {1} get off and {2} get on. How many passengers are on the bus?",
        &[Op::Sub, Op::Add],
    ),
    ("{name} saves {0} dollars a week for {1} weeks and spends {2} dollars on a gift. How many dollars are left?", &[Op::Mul, Op::Sub]),
    (
        "A farm has {0} hens. Each hen lays {1} eggs a week. {2} eggs break. How many eggs are left at the end of the week?",
        &[Op::Mul, Op::Sub],
    ),
    ("{name} has {0} marbles, wins {1} more, and then wins {2} more. How many marbles does {name} have?", &[Op::Add, Op::Add]),
    ("There are {0} rows of {1} chairs in a hall, and {2} chairs are taken away. How many chairs are left?", &[Op::Mul, Op::Sub]),
];
const THREE_STEPS: &[(&str, &[Op])] = &[
    (
        "{name} has {0} apples. {pron} buys {1} more, gives {2} to a friend, and then buys {3} more. How many apples does {name} have now?",
        &[Op::Add, Op::Sub, Op::Add],
    ),
    (
        "A shop sells pencils in boxes of {0}. {name} buys {1} boxes, then {2} loose pencils, and gives {3} pencils away. How many pencils does {name} have?",
        &[Op::Mul, Op::Add, Op::Sub],
    ),
    (
        "A bus starts with {0} passengers. At the first stop {1} get off and {2} get on. At the second stop {3} get off. How many passengers are on the bus?",
        &[Op::Sub, Op::Add, Op::Sub],
    ),
    (
        "{name} saves {0} dollars a week for {1} weeks, earns {2} dollars more, and spends {3} dollars on a gift. How many dollars are left?",
        &[Op::Mul, Op::Add, Op::Sub],
    ),
    (
        "A farm has {0} hens. Each hen lays {1} eggs a week. {2} eggs break and {3} are sold. How many eggs are left at the end of the week?",
        &[Op::Mul, Op::Sub, Op::Sub],
    ),
    (
        "{name} has {0} marbles, wins {1} more, wins {2} more, and then loses {3}. How many marbles does {name} have?",
        &[Op::Add, Op::Add, Op::Sub],
    ),
];
const NAMES: &[(&str, &str)] =
    &[("Ana", "She"), ("Ben", "He"), ("Chen", "He"), ("Dara", "She"), ("Eli", "He"), ("Fatima", "She"), ("Goran", "He"), ("Hana", "She")];

/// `n` distinct problems of one split and level, from `seed`.
pub fn generate(n: usize, seed: u64, split: Split, level: Level) -> Vec<Problem> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    let mut tries = 0;
    let templates = level.templates();
    while out.len() < n && tries < n * 200 {
        tries += 1;
        let (template, ops) = templates[rng.gen_range(0..templates.len())];
        let (name, pron) = NAMES[rng.gen_range(0..NAMES.len())];
        let mut nums = vec![];
        let mut value = 0i64;
        let mut steps = vec![];
        for (i, op) in ops.iter().enumerate() {
            if i == 0 {
                value = level.first(*op, &mut rng);
                nums.push(value);
            }
            let b = level.operand(*op, value, &mut rng);
            nums.push(b);
            let r = op.apply(value, b);
            steps.push((value, *op, b, r));
            value = r;
        }
        if steps.iter().any(|s| s.3 < 0) {
            continue;
        }
        let mut q = template.replace("{name}", name).replace("{pron}", pron);
        for (i, v) in nums.iter().enumerate() {
            q = q.replace(&format!("{{{i}}}"), &v.to_string());
        }
        if split_of(&q) != split || !seen.insert(q.clone()) {
            continue;
        }
        let side = if split == Split::Train { "train" } else { "heldout" };
        let id =
            if level == Level::DEFAULT { format!("{side}-{}", out.len()) } else { format!("l{}-{side}-{}", level.number(), out.len()) };
        out.push(Problem { id, question: q, steps, answer: value });
    }
    out
}

/// A number in text: digits with optional thousands commas and sign.
fn numbers(s: &str) -> Vec<(usize, usize, i64)> {
    let b = s.as_bytes();
    let mut out = vec![];
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = if i > 0 && b[i - 1] == b'-' && (i < 2 || !b[i - 2].is_ascii_alphanumeric()) { i - 1 } else { i };
            let mut j = i;
            let mut digits = String::new();
            while j < b.len()
                && (b[j].is_ascii_digit() || (b[j] == b',' && j + 1 < b.len() && b[j + 1].is_ascii_digit() && !digits.is_empty()))
            {
                if b[j] != b',' {
                    digits.push(b[j] as char);
                }
                j += 1;
            }
            // A decimal part makes it not an integer claim: skip it whole.
            if j + 1 < b.len() && b[j] == b'.' && b[j + 1].is_ascii_digit() {
                j += 1;
                while j < b.len() && b[j].is_ascii_digit() {
                    j += 1;
                }
                i = j;
                continue;
            }
            if let Ok(v) = digits.parse::<i64>() {
                out.push((start, j, if start < i { -v } else { v }));
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// What one sentence claims.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Claims {
    /// Equations `a op b (op c ...) = r`: (left-to-right value, stated r).
    pub equations: Vec<(i64, i64)>,
    /// Results stated in words ("which makes 42", "leaves 7").
    pub stated: Vec<i64>,
    /// "The answer is N" / "#### N".
    pub final_answer: Option<i64>,
}

/// Reads the calculations of one sentence. Ambiguous text (no operator
/// between two numbers, an unknown word) claims nothing.
pub fn claims(sentence: &str) -> Claims {
    let s = sentence.replace('×', "*").replace('÷', "/").replace('−', "-");
    let lower = s.to_ascii_lowercase();
    let mut c = Claims::default();
    let nums = numbers(&s);
    // Equations: number (op number)+ = number, with only spaces, operators and `$` between.
    let mut k = 0;
    while k < nums.len() {
        let mut value = nums[k].2;
        let mut j = k;
        let mut ops = 0;
        loop {
            if j + 1 >= nums.len() {
                break;
            }
            let between = s[nums[j].1..nums[j + 1].0].trim().trim_matches('$').trim();
            let op = match between {
                "+" | "plus" => Op::Add,
                "-" | "minus" => Op::Sub,
                "*" | "x" | "times" => Op::Mul,
                _ => break,
            };
            value = op.apply(value, nums[j + 1].2);
            ops += 1;
            j += 1;
        }
        if ops > 0 && j + 1 < nums.len() {
            let between = s[nums[j].1..nums[j + 1].0].trim().trim_matches('$').trim();
            if between == "=" || between == "is" || between == "equals" {
                c.equations.push((value, nums[j + 1].2));
                k = j + 2;
                continue;
            }
        }
        k = j.max(k) + 1;
    }
    // A result stated in words: the number right after one of these.
    for key in [
        "which makes",
        "that makes",
        "this makes",
        "which leaves",
        "that leaves",
        "leaves",
        "left with",
        "total of",
        "now has",
        "now have",
        "we get",
        "result is",
    ] {
        let mut from = 0;
        while let Some(p) = lower[from..].find(key) {
            let at = from + p + key.len();
            if let Some(&(a, _, v)) = nums.iter().find(|n| n.0 >= at) {
                if lower[at..a].trim().trim_start_matches(['$', ':']).trim().is_empty() {
                    c.stated.push(v);
                }
            }
            from = at;
        }
    }
    c.stated.sort_unstable();
    c.stated.dedup();
    for key in ["the answer is", "answer:", "####", "final answer"] {
        if let Some(p) = lower.rfind(key) {
            if let Some(&(_, _, v)) = nums.iter().find(|n| n.0 >= p + key.len()) {
                c.final_answer = Some(v);
            }
        }
    }
    c
}

/// The whole answer checked: per-segment scores and whether its final
/// answer (the stated one, else the last number) is right.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub response: Response,
    pub final_answer: Option<i64>,
    pub correct: bool,
    /// Calculations the answer states (`a op b = c`), and how many are wrong.
    pub calculations: usize,
    pub wrong_calculations: usize,
}

fn normalised(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace())
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// Scores every sentence of `answer` to `problem` (see the module docs).
pub fn check(problem: &Problem, answer: &str) -> Checked {
    let values: Vec<i64> = problem.steps.iter().map(|s| s.3).collect();
    let mut reached = vec![false; values.len()];
    let mut seen: Vec<String> = vec![];
    let mut segments = vec![];
    let mut final_answer = None;
    let (mut calculations, mut wrong_calculations) = (0, 0);
    let texts = segment(answer);
    for text in &texts {
        let c = claims(text);
        let wrong_eqs = c.equations.iter().filter(|(v, r)| v != r).count();
        calculations += c.equations.len();
        wrong_calculations += wrong_eqs;
        let wrong_eq = wrong_eqs > 0;
        let results: Vec<i64> = c.equations.iter().map(|e| e.1).chain(c.stated.iter().copied()).collect();
        let wrong_value = c.stated.iter().any(|v| !values.contains(v) && *v != problem.answer);
        if let Some(f) = c.final_answer {
            final_answer = Some(f);
        }
        let wrong_final = c.final_answer.is_some_and(|f| f != problem.answer);
        let wrong = wrong_eq || wrong_value || wrong_final;
        let mut progressed = false;
        for r in &results {
            if let Some(i) = values.iter().position(|v| v == r) {
                if !reached[i] {
                    reached[i] = true;
                    progressed = true;
                }
            }
        }
        if c.final_answer == Some(problem.answer) {
            progressed |= !reached.iter().all(|r| *r);
            reached.iter_mut().for_each(|r| *r = true);
        }
        let n = normalised(text);
        let repeated = !n.is_empty() && seen.contains(&n);
        seen.push(n);
        let words = text.split_whitespace().count();
        let done = reached.iter().filter(|r| **r).count();
        let scores = Scores::from_array([
            if wrong {
                0
            } else if progressed {
                4
            } else {
                2
            },
            if wrong { 0 } else { 4 },
            4,
            ((4 * done) as f64 / values.len().max(1) as f64).round() as u8,
            if repeated {
                1
            } else if words > 60 {
                2
            } else {
                4
            },
        ]);
        segments.push(Segment { text: text.to_string(), scores: Some(scores) });
    }
    let final_answer = final_answer.or_else(|| numbers(answer).last().map(|n| n.2));
    let correct = final_answer == Some(problem.answer);
    Checked { response: Response::Segmented { segments }, final_answer, correct, calculations, wrong_calculations }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem() -> Problem {
        // 23 + 12 = 35, 35 - 9 = 26.
        Problem {
            id: "p".into(),
            question: "Ana has 23 apples...".into(),
            steps: vec![(23, Op::Add, 12, 35), (35, Op::Sub, 9, 26)],
            answer: 26,
        }
    }

    fn scores(c: &Checked) -> Vec<[u8; 5]> {
        c.response.segments().unwrap().iter().map(|s| s.scores.unwrap().to_array()).collect()
    }

    #[test]
    fn reads_equations_and_stated_results() {
        assert_eq!(claims("She has 23 + 12 = 35 apples.").equations, vec![(35, 35)]);
        assert_eq!(claims("Then 35 - 9 = 27.").equations, vec![(26, 27)]);
        assert_eq!(claims("4 × 6 = 24 and 24 + 3 = 27").equations, vec![(24, 24), (27, 27)]);
        assert_eq!(claims("2 + 3 + 4 = 9").equations, vec![(9, 9)]);
        assert_eq!(claims("She gives away 9, which makes 26.").stated, vec![26]);
        assert_eq!(claims("She gives 9 to a friend.").stated, Vec::<i64>::new());
        assert_eq!(claims("That leaves 7 apples").stated, vec![7]);
        assert_eq!(claims("The answer is 1,250.").final_answer, Some(1250));
        assert_eq!(claims("#### 26").final_answer, Some(26));
        // Ambiguous: numbers without an operator, a decimal, a date.
        assert_eq!(claims("On 12 May 2024 she had 3 cats."), Claims::default());
        assert_eq!(claims("It costs 2.50 = cheap").equations, vec![]);
    }

    #[test]
    fn scores_a_correct_answer() {
        let c = check(
            &problem(),
            "Ana starts with 23 apples. She buys 12 more: 23 + 12 = 35. Then she gives away 9, so 35 - 9 = 26. The answer is 26.",
        );
        assert!(c.correct);
        assert_eq!(c.final_answer, Some(26));
        let s = scores(&c);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0], [2, 4, 4, 0, 4]); // restates the question: no progress, nothing wrong
        assert_eq!(s[1], [4, 4, 4, 2, 4]); // first step done
        assert_eq!(s[2], [4, 4, 4, 4, 4]); // second step done
        assert_eq!(s[3], [2, 4, 4, 4, 4]); // the answer, already reached
    }

    #[test]
    fn scores_a_wrong_and_a_repetitive_answer() {
        let c = check(
            &problem(),
            "First, 23 + 12 = 36 apples after buying. Then she gives some away, and 36 - 9 = 27 apples remain. So the answer is 27 apples.",
        );
        assert_eq!(scores(&c).len(), 3);
        assert!(!c.correct);
        let s = scores(&c);
        assert_eq!(s[0][1], 0, "wrong sum");
        assert_eq!(s[1][1], 4, "36 - 9 = 27 is right arithmetic but 27 is not a value of the solution");
        assert_eq!(s[2][1], 0, "wrong final answer");
        let c = check(
            &problem(),
            "She buys more apples, so 23 + 12 = 35 in total. She buys more apples, so 23 + 12 = 35 in total. After giving nine away, 35 - 9 = 26 apples are left.",
        );
        assert_eq!(scores(&c).len(), 3);
        assert!(c.correct, "the last number is the answer");
        let s = scores(&c);
        assert_eq!(s[1][4], 1, "a repeated sentence is unclear");
        assert_eq!(s[1][0], 2, "and no progress");
    }

    #[test]
    fn generated_sets_are_seeded_disjoint_and_consistent() {
        for level in Level::ALL {
            let train = generate(300, 1, Split::Train, level);
            let held = generate(200, 1, Split::HeldOut, level);
            assert_eq!((train.len(), held.len()), (300, 200));
            assert_eq!(train, generate(300, 1, Split::Train, level));
            let qs: std::collections::HashSet<&str> = train.iter().map(|p| p.question.as_str()).collect();
            assert!(held.iter().all(|p| !qs.contains(p.question.as_str())));
            for p in train.iter().chain(&held) {
                assert_eq!(p.steps.len(), level.steps, "{}", p.question);
                assert!(p.steps.iter().all(|s| s.3 >= 0), "{}", p.question);
                assert!(!p.question.contains('{'), "{}", p.question);
                assert_eq!(p.steps.last().unwrap().3, p.answer);
                for w in p.steps.windows(2) {
                    assert_eq!(w[0].3, w[1].0);
                }
                // The reference solution passes its own check.
                let sol: String = p
                    .steps
                    .iter()
                    .map(|(a, op, b, r)| {
                        format!(
                            "{a} {} {b} = {r}. ",
                            match op {
                                Op::Add => "+",
                                Op::Sub => "-",
                                Op::Mul => "*",
                            }
                        )
                    })
                    .collect::<String>()
                    + &format!("The answer is {}.", p.answer);
                let c = check(p, &sol);
                assert!(c.correct, "{sol}");
                assert!(scores(&c).iter().all(|s| s[1] == 4), "{sol}");
                assert_eq!((c.calculations, c.wrong_calculations), (level.steps, 0), "{sol}");
            }
        }
    }

    #[test]
    fn levels_parse_and_name_themselves() {
        for (i, l) in Level::ALL.into_iter().enumerate() {
            assert_eq!(Level::parse(&l.name()), Some(Ok(l)));
            assert_eq!(l.number(), i + 1);
        }
        assert_eq!(Level::parse("arithmetic"), Some(Ok(Level::DEFAULT)));
        assert_eq!(Level::parse("arithmetic-5"), Some(Ok(Level::DEFAULT)));
        assert!(matches!(Level::parse("arithmetic-9"), Some(Err(_))));
        assert!(matches!(Level::parse("arithmetic-x"), Some(Err(_))));
        assert_eq!(Level::parse("mt-bench"), None);
        assert_eq!(Level::parse("arithmetics"), None);
    }

    #[test]
    fn the_default_level_is_the_set_it_always_was() {
        // Earlier results (docs/experiments.md) were measured on these problems.
        let p = &generate(1, 2024, Split::HeldOut, Level::DEFAULT)[0];
        assert_eq!(p.id, "heldout-0");
        assert_eq!(p.question, "Goran saves 2 dollars a week for 4 weeks and spends 6 dollars on a gift. How many dollars are left?");
        assert_eq!(p.prompt(), format!("{}\nWork it out step by step, then give the final answer as: The answer is N.", p.question));
    }

    #[test]
    fn counts_wrong_calculations() {
        let c = check(&problem(), "23 + 12 = 35. Then 35 - 9 = 27. The answer is 27.");
        assert_eq!((c.calculations, c.wrong_calculations), (2, 1));
    }
}
