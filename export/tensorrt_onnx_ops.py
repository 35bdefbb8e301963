"""What TensorRT's ONNX parser accepts, as data: onnx-tensorrt `docs/operators.md` for TensorRT 10.15
(opsets 9 to 24). `SUPPORTED` maps each supported op to its documented restriction ("" when none);
`UNSUPPORTED` lists the ops the table marks "N". `gmaivl_rt.export.op_inventory` checks graphs against it."""

TENSORRT_VERSION = "10.15"
OPSET_MIN, OPSET_MAX = 9, 24

SUPPORTED = {
    "Abs": "", "Acos": "", "Acosh": "", "Add": "", "And": "", "ArgMax": "", "ArgMin": "", "Asin": "", "Asinh": "",
    "Atan": "", "Atanh": "",
    "Attention": "Q, K, V and attn_mask must be 4D; past_key, past_value and nonpad_kv_seqlen inputs, present_key, "
                 "present_value and qk_matmul_output outputs, qk_matmul_output_mode and softcap are unsupported",
    "AveragePool": "2D or 3D pooling only; dilations empty or all ones", "BatchNormalization": "",
    "BlackmanWindow": "", "Cast": "", "CastLike": "", "Ceil": "", "Celu": "", "Clip": "", "Concat": "",
    "Constant": "sparse_value, value_string and value_strings attributes are unsupported", "ConstantOfShape": "",
    "Conv": "", "ConvTranspose": "", "Cos": "", "Cosh": "", "CumSum": "axis must be a build-time constant",
    "DeformConv": "1D or 2D spatial input; symmetric pads", "DepthToSpace": "",
    "DequantizeLinear": "x_zero_point must be zero", "Div": "",
    "Dropout": "is_training must be an initializer evaluating to False", "Einsum": "", "Elu": "", "Equal": "",
    "Erf": "", "Exp": "", "Expand": "", "EyeLike": "input must have static dimensions", "Flatten": "", "Floor": "",
    "Gather": "", "GatherElements": "", "GatherND": "", "Gelu": "", "Gemm": "", "GlobalAveragePool": "",
    "GlobalLpPool": "", "GlobalMaxPool": "", "Greater": "", "GreaterOrEqual": "", "GridSample": "input must be 4D",
    "GroupNormalization": "", "GRU": "", "HammingWindow": "", "HannWindow": "", "HardSigmoid": "", "HardSwish": "",
    "Hardmax": "axis dimension must be a build-time constant", "Identity": "",
    "If": "branch outputs must have the same rank and different names", "ImageScaler": "",
    "InstanceNormalization": "", "IsInf": "", "IsNaN": "",
    "LayerNormalization": "only the first output Y is supported", "LeakyRelu": "", "Less": "", "LessOrEqual": "",
    "Log": "", "LogSoftmax": "", "Loop": "scan output length cannot be dynamic", "LRN": "",
    "LSTM": "input_forget must be 0; layout must be 0", "LpNormalization": "", "LpPool": "", "MatMul": "",
    "Max": "", "MaxPool": "2D or 3D pooling only; Indices output unsupported", "Mean": "",
    "MeanVarianceNormalization": "", "Min": "", "Mish": "", "Mod": "", "Mul": "", "Neg": "",
    "NonMaxSuppression": "", "NonZero": "", "Not": "", "OneHot": "depth must be a build-time constant", "Or": "",
    "Pad": "", "ParametricSoftplus": "", "Pow": "", "PRelu": "", "QuantizeLinear": "y_zero_point must be 0",
    "RandomNormal": "", "RandomNormalLike": "", "RandomUniform": "", "RandomUniformLike": "", "Range": "",
    "Reciprocal": "", "ReduceL1": "", "ReduceL2": "", "ReduceLogSum": "", "ReduceLogSumExp": "", "ReduceMax": "",
    "ReduceMean": "", "ReduceMin": "", "ReduceProd": "", "ReduceSum": "", "ReduceSumSquare": "", "Relu": "",
    "Reshape": "",
    "Resize": "modes nearest and linear only (no cubic); no antialiasing; aspect ratio policy stretch",
    "ReverseSequence": "", "RMSNormalization": "", "RNN": "", "RoiAlign": "",
    "RotaryEmbedding": "position_ids must be INT64", "Round": "", "STFT": "", "ScaledTanh": "", "Scan": "",
    "Scatter": "", "ScatterElements": "", "ScatterND": "reduction other than none is unsupported", "Selu": "",
    "Shape": "", "Shrink": "", "Sigmoid": "", "Sign": "", "Sin": "", "Sinh": "", "Size": "", "Slice": "",
    "Softmax": "", "Softplus": "", "Softsign": "", "SpaceToDepth": "", "Split": "", "Sqrt": "",
    "Squeeze": "axes must be resolvable to a constant", "Sub": "", "Sum": "", "Tan": "", "Tanh": "",
    "TensorScatter": "past_cache and update must be 4D; axis must be -2", "ThresholdedRelu": "", "Tile": "",
    "TopK": "sorted must be 1; K below 3840", "Transpose": "", "Trilu": "",
    "Unsqueeze": "axes must be resolvable to a constant", "Upsample": "", "Where": "", "Xor": "",
}

UNSUPPORTED = {
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor", "Col2Im",
    "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det", "DynamicQuantizeLinear",
    "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool", "MelWeightMatrix", "Multinomial",
    "NegativeLogLikelihoodLoss", "Optional", "OptionalGetElement", "OptionalHasElement", "QLinearConv",
    "QLinearMatMul", "RegexFullMatch", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase",
    "SequenceInsert", "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence",
    "StringConcat", "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
}
