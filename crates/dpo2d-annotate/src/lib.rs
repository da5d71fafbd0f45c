//! LLM annotation: turning preference pairs into 2-D pairs by asking a judge
//! model to score every segment on each aspect.
